"""fedrec ClientApp: one silo's local training and evaluation."""
