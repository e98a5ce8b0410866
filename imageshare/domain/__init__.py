"""Plain-Python domain core: identifiers, value objects and errors; imports nothing of ours."""
