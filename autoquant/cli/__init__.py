"""The `autoquant` command: main.py dispatches, args.py holds what every command line shares,
outputs.py writes a run's files. Imports nothing here so `autoquant.cli.args` is cheap for the
commands serve and bench declare."""
