"""Runs kosoku (the Autobahn TestSuite cases, natively) with one fix to kosoku 0.1.0.

Usage is kosoku's own (`python autobahn.py -p 4 -i '1.*' ... 127.0.0.1:9001`), run by
tests/deflate.rs and by the full-run command in docs/BENCHMARKS.md.

The fix: kosoku hands a case's `onMessage` the payload as a `str` (text as is, binary
decoded as latin-1), where the Python 2 case files expect bytes. The compression cases
(12.x and 13.x, one module) hash and `.decode()` what they receive, so under kosoku 0.1.0 every one of
them errors ("Strings must be encoded before hashing") whatever the server does. Their
`onMessage` is wrapped to turn the payload back into the bytes that were on the wire
(UTF-8 for text, latin-1 for binary) before the case's own checks run; nothing else is
changed.
"""

import sys

from kosoku import _caseindex
from kosoku._cli import main

_caseindex.initialize_shims()

import case12_x_x  # noqa: E402  (importable once the shims put the cases on sys.path)


def _bytes_payload(on_message):
    def wrapped(self, msg, binary):
        if isinstance(msg, str):
            msg = msg.encode("latin-1" if binary else "utf-8")
        return on_message(self, msg, binary)

    return wrapped


for attribute in ["Case12_X_X", "Case13_X_X"]:
    for case in getattr(case12_x_x, attribute, []):
        case.onMessage = _bytes_payload(case.onMessage)

sys.exit(main())
