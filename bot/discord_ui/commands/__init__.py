"""The slash and message commands, one module per group: /pony, the member commands (/pony-queue,
/pony-info), /pony-admin, and the info commands (/pony-stats, /pony-about).
"""
