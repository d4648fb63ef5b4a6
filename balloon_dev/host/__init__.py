"""The host side of the balloon: what a hypervisor does with the device's effects (the
pre-copy migration in ``precopy``). It reaches the device only through ``balloon_dev.effects``.
"""
