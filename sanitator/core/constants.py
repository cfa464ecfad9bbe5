"""Numbers more than one room relies on, defined once and free of torch (the CLI's parsers
read them at start-up)."""

# The one flagging threshold (REFERENCE.md §5): sign agreement above it matches a PV. The
# scan's tests, the attack measurement, the monitor and the PV artifact all use it.
MONITOR_THRESHOLD = 0.8
