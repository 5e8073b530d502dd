"""The asyncio runtime: schedules collectors, supervises them, serves, shuts down."""
