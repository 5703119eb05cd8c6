"""`tutum-bridge bench`: what the real bridge's guarantees cost, measured against a naive bridge.

cli (options, table, JSON) -> harness (sessions of simulator, bridge and consumer)
-> children (process groups), meter (CPU, peak RSS), topology (broker names),
proxy (the broker cut off, for the backlog). naive and consumer run as child processes.
"""
