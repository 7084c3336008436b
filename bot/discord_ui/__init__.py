"""Everything members see and press: the discord.Client, the use cases behind /pony and the buttons,
delivery of status and result messages, message texts, buttons, uploads and the slash commands.
May import every other bot package; nothing imports it but `bot.app` and `bot.cli`.
"""
