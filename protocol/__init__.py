"""Sans-IO core of p2p-node: content ids, canonical encoding, records and pure rules.

Nothing here opens a socket, starts a loop or imports torch; every function
works on plain values so it can be tested with plain values.
"""
