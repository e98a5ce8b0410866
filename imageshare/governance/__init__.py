"""Information governance beyond retention: the patient's consent records."""
