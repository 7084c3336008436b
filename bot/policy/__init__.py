"""Guard rails: who may queue what, where (bans, allowed channels, blocked terms, limits per guild),
prompt hygiene and the channel permissions ponybot needs. May import `bot.jobs` and the base modules.
"""
