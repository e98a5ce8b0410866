"""Sharing: links with passcodes, recipients, comments, feedback and notifications."""
