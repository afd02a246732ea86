"""The model and how it runs: patch networks and their dense form, scoring, the bundle format."""
