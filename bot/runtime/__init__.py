"""The GPU side of the bot: the engine (one GPU thread), the worker that drains the queue, post-processing
(save, record, hand to delivery) and result files. No Discord import: delivery and the image filter
come in as typed collaborators. May import `bot.jobs`, the base modules and `generator`.
"""
