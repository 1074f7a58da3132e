"""moeconv: turn a Mixture-of-Experts checkpoint into the exact layout a backend wants."""

__version__ = "0.1.0"
