"""What a written disk holds: its filesystems checked read-only, LVM read without activating
anything, the firmware it boots by and the console that shows it booted."""
