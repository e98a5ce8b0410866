"""Retention: classes set by policy, legal holds, two-administrator deletion, the expiry job."""
