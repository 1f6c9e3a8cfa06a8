"""`sieve train reranker` / `sieve eval reranker` on the device machine (sieve.cli also imports the service, whose
generated gRPC stubs want newer grpc/protobuf than the device image has)."""

import typer
from sieve.reranker.cli import eval_reranker, train_reranker

app = typer.Typer()
train = typer.Typer()
evaluate = typer.Typer()
app.add_typer(train, name="train")
app.add_typer(evaluate, name="eval")
train.command("reranker")(train_reranker)
evaluate.command("reranker")(eval_reranker)

if __name__ == "__main__":
    app()
