"""The web app's pages: one module per kind of page, all rendered on the server."""
