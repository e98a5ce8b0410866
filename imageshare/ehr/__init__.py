"""Working with electronic health records: launching ImageShare from them."""
