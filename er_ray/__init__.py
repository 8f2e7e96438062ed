"""er-ray: EarlyRobust (robust early-bird tickets for efficient adversarial training) as a library, on Ray."""

__version__ = "0.1.0"
