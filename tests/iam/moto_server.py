#!/usr/bin/env python3
"""moto's server for tests/tests/iam.rs: `moto_server ARGS`, with one change.

moto checks a request's SigV4 signature by re-encoding the form body it has
already parsed, with `+` for a space; the Rust SDK (correctly) signs `%20`.
Every EC2 call with a space in a value (a CreateImage or CopyImage
description) would fail with AuthFailure. The signature check is therefore
skipped; everything IAM enforcement is about still runs: the access key must
belong to an IAM user or an assumed role, and the action must be allowed by
that principal's policies.
"""
import sys

from moto.iam.access_control import IAMRequestBase
from moto.server import main

IAMRequestBase.check_signature = lambda self: None

if __name__ == "__main__":
    main(sys.argv[1:])
