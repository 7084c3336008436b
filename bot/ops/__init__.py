"""Running the bot: metrics and health, /pony-stats numbers, `ponybot doctor` and the about text.
May import `bot.runtime`, `bot.jobs`, `bot.policy` and the base modules; never `bot.discord_ui`.
"""
