"""The peer a volunteer runs: transport, admission control, and the serving process.

Submodules are imported on use, so that clients can import `swarmlens.peer.transport`
without loading the block runner and its model code.
"""
