"""Numbered exit codes shared by every command."""

OK = 0
FAILURE = 1
USAGE = 2  # bad flag, bad path, bad config: argparse uses 2 as well
BROKER = 3  # broker unreachable or credentials refused
UNACKED = 4  # device stopped with samples not acknowledged by the cloud
GATE_REFUSED = 5  # lepton train: the evaluation gate kept the new model
NOT_IMPLEMENTED = 6
INTERRUPTED = 130
