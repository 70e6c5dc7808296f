from jaxdit.cli.train import run

if __name__ == "__main__":
    run()
