"""The greedy_soup step: `step` gathers the ranked ingredient runs (`ingredients`), cooks the
chosen method and the compared ones, `report` says what came of it and `publish` logs and
registers the soup."""
