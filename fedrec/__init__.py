"""fedrec's Python API for notebooks: run, then recommend.

>>> import fedrec
>>> run = fedrec.simulate({"num-server-rounds": 3}, runtime="inprocess")
>>> rec = fedrec.load(run.path, silo=0)
>>> rec.recommend(rec.user_ids[:2], k=5)

See docs/python-api.md.
"""

from fedrec.api import Run, centralized, load, simulate
from serving.silo import Recommendation, Recommender, ServingError

__all__ = ["Recommendation", "Recommender", "Run", "ServingError", "centralized", "load", "simulate"]
