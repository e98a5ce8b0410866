"""The SQL index of patients, studies, series and instances (SQLAlchemy Core)."""
