"""The wire: what crosses between nodes and between actors.

The message catalog (:mod:`.messages`) and its msgpack codec (:mod:`.codec`), stream framing
(:mod:`.framing`), node identity and certificates (:mod:`.identity`), invite tokens and mesh
membership (:mod:`.invite`), and the Hello that admits a peer (:mod:`.admission`). Nothing here does
I/O beyond reading one frame from a stream.
"""
