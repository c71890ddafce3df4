from sarft.cli import app

app()
