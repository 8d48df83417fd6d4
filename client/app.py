"""fedrec ClientApp: wires Flower messages to a silo's rounds (:mod:`client.rounds`)."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import packed, rounds, secagg
from common import records
from common.run_config import with_defaults

app = ClientApp()


# ---------------------------------------------------------------- handlers
@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the silo's users on the received shared model; reply with shared params only.

    A message with evaluate instructions (``eval.fused``) is evaluated first, in the same reply.
    """
    context.run_config = with_defaults(context.run_config)
    if packed.is_packed(context.run_config):  # many by-user clients in this node (simulation.clients-per-node)
        return Message(content=packed.train(msg.content, context), reply_to=msg)
    session = rounds.open_session(msg.content, context)
    evaluate_config = msg.content.config_records.get(records.EVALUATE_CONFIG)
    return Message(content=rounds.train(session, evaluate_config), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the silo's own users; reply with sums the server can add up."""
    context.run_config = with_defaults(context.run_config)
    if packed.is_packed(context.run_config):
        return Message(content=packed.evaluate(msg.content, context), reply_to=msg)
    session = rounds.open_session(msg.content, context)
    return Message(content=rounds.evaluate(session), reply_to=msg)


@app.query(secagg.ACTION)
def secure_aggregation(msg: Message, context: Context) -> Message:
    """One stage of a secure sum (``query.secagg``) over the vector this silo staged for the round."""
    return secagg.handle(msg, context)
