"""One router per resource; handlers stay thin (the logic lives in the ledger and the recommender)."""
