def test_a_decision_as_columns_reads_back_as_its_rows() -> None:
    from autorank.ranking.assignment import decision_columns, rows_of_columns

    record = {
        "clients": [
            {"client": 0, "samples": 5, "labels_held": 2, "entropy": 0.5, "closeness": 0.25,
             "rank": 4, "layer_ranks": {"fc1": 4, "fc2": 3}, "cap": None},
            {"client": 7, "samples": 9, "labels_held": 3, "entropy": 0.9, "closeness": None,
             "rank": 8, "layer_ranks": {"fc1": 8, "fc2": 6}, "cap": 8},
        ]
    }  # fmt: skip

    columns = decision_columns(record)

    assert columns["rank/fc2"] == [3, 6] and columns["client"] == [0, 7]
    assert rows_of_columns(columns) == record["clients"]
    assert decision_columns({"clients": []}) == {} and rows_of_columns({}) == []
