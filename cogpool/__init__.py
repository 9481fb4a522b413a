"""The ``cog-pool`` application: the command line that wires ``pool`` (the runtime) and
``ingest`` (the queue consumers) together. ``pool`` never imports ``ingest`` or ``cogpool``."""
