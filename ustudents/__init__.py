"""ustudents: Uninformed Students anomaly detection for production-line inspection."""
__version__ = "0.1.0"
