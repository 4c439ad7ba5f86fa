"""Reading a finished study: the paper's reference numbers, statistics, tables, the paper's claims and the
patch-token geometry of its encoders."""
