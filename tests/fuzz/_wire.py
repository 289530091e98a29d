"""csrc/net/wire.h's frame headers and constants, as a raw peer writes them (the data-plane fuzz target and
tests/test_data_plane.py both speak the protocol byte by byte)."""

import struct

REQ = struct.Struct("<IBBHIIQQQ")  # RequestHeader
REP = struct.Struct("<IB3sIIQQQ")  # ReplyHeader
REQ_MAGIC, REP_MAGIC = 0x31455350, 0x52455350
PULL, PUSH = 1, 2
WITH_STATS, HAS_SLOTS, HAS_PUSH_ID = 1, 2, 4
MAX_NAME, MAX_KEYS, MAX_WIDTH = 1024, 2**31 - 1, 1 << 16
OK, INVALID, NOT_FOUND, CORRUPTION = 0, 1, 2, 3
