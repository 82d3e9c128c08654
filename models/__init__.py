"""Training and export of the networks (torch). Nothing in service/ imports from here at run time."""
