"""What every layer shares and nothing above it: errors, units, console output, atomic files,
the cache root. Imports nothing from the rest of autoquant."""
