"""Which completions refuse: the judges a --judge value names (rules, the packaged classifier, a server) and
`audit classify`. The judging rules themselves are pure: checks/refusal*.py.
"""
