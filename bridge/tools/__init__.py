"""Worker-side tools: watch events live (`tail`), declare a worker's queue (`bind`),
see the whole pipeline at once (`demo`), and a helper for writing a worker (`worker`).

They talk to the broker the way the bridge does (same exchange declaration, same
configuration names), so a tool never creates a topology the bridge would refuse.
"""
