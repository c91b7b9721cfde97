"""Active learning: mine candidate pairs, choose which to ask about, simulate labelling rounds."""
