"""The platform's assets (keys are public interface: design.md)."""
