"""The controller: the I/O shell around the scheduler core, and the engines it launches."""
