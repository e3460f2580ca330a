"""The scorers, rule for rule as the official scripts (docs/scoring-rules.md; docs/scoring.md).

    rules.py               what every scorer shares: thresholds, the timestamp parser, IoUs, the
                           multiple-choice helpers, the field checks, Unscorable
    etbench.py             E.T.Bench's compute_metrics.py (protocols etchat and strict), the dispatcher
                           score_etbench, the summary table, the predictions reader
    d2vlm.py               the D2VLM release's new_compute_metrics.py --delimiter v3 (protocol d2vlm)
    captions.py            dense captioning (DVC, SLC; YouCook2 too): parsers, F1, Bleu ... SentSim
    charades_youcook2.py   Charades-STA and YouCook2 in TimeChat's format, as the release scores them
"""
