"""``python -m vmafs.mount SOURCE TARGET ...``: the same as ``mount.vmafs``."""

import sys

from .helper import mount_helper_main

sys.exit(mount_helper_main())
