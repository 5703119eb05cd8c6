"""A Tutum-compatible stream server (`tutum-bridge simulate`), since the hosted one is gone.

world: the seeded event generator; source: the one global stream of frames;
auth: credential checks; server: routes, sessions, pacing, faults; cli: the verb.
"""
