from matxfer.cli import run

run()
