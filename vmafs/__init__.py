"""vmafs: Proxmox VMA backups as a read-only filesystem, and a VMA writer for QEMU backups."""

__version__ = "0.1.0"
