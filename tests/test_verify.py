"""The verifier (agent.domain.verify) on the wrong sentences the issue found, seeded, and on
right ones: each wrong sentence must be caught with a message that names what is wrong, and a
right one must pass (a verifier that flags everything would "catch" everything)."""

from __future__ import annotations

import pytest

from agent.domain.verify import Facts, TitleIndex, refs_in, verify_sentence

# titles from UCI Online Retail (customer 17850's answer in the issue), plus a mixed-case one
CATALOGUE = TitleIndex([
    "HAND WARMER RED LOVE HEART", "HAND WARMER UNION JACK", "HOT WATER BOTTLE KEEP CALM",
    "RETROSPOT HEART HOT WATER BOTTLE", "WHITE HANGING HEART T-LIGHT HOLDER", "RED TOADSTOOL LED NIGHT LIGHT",
    "SET 7 BABUSHKA NESTING BOXES", "Super Mario Odyssey", "Halo", "MUG",
])
# the 5th item's "why": it may name itself and its cited event E20 (bought 12 x HAND WARMER UNION JACK)
ITEM5 = Facts(titles=["RETROSPOT HEART HOT WATER BOTTLE", "HAND WARMER UNION JACK"], refs=["E20"],
              numbers=["bought 12 × HAND WARMER UNION JACK at 1.85 each (order 536365)"])
SUMMARY = Facts(titles=["HAND WARMER RED LOVE HEART", "HAND WARMER UNION JACK", "HOT WATER BOTTLE KEEP CALM"],
                refs=["E1", "E2", "E20"], numbers=["bought 12 × HAND WARMER UNION JACK"], may_rank_first=True,
                top_title="HAND WARMER RED LOVE HEART")
# the chat's facts: the ranked items best first, and a history item (a cited event's) besides
RANKED = Facts(titles=["HAND WARMER RED LOVE HEART", "HOT WATER BOTTLE KEEP CALM", "WHITE HANGING HEART T-LIGHT HOLDER"],
               may_rank_first=True, top_title="HAND WARMER RED LOVE HEART",
               ranked=["HAND WARMER RED LOVE HEART", "HOT WATER BOTTLE KEEP CALM"])


@pytest.mark.parametrize(("text", "facts", "violation"), [
    # a product the reason does not cite (the T-light holder for a hot water bottle)
    ("Same heart design as the WHITE HANGING HEART T-LIGHT HOLDER", ITEM5,
     "names 'WHITE HANGING HEART T-LIGHT HOLDER', which is not the product explained or an event it cites"),
    # a product named by a mixed-case catalogue title
    ("Goes with Super Mario Odyssey", ITEM5,
     "names 'Super Mario Odyssey', which is not the product explained or an event it cites"),
    # the text names E2 while its evidence is E20
    ("Bought with E2 in winter", ITEM5, "cites E2, which is not among its evidence ['E20']"),
    # a quantity the data does not hold
    ("Bought 6 warmers at once", ITEM5, "states 6, which is not in the data; use only numbers shown"),
    # an upper-case run that is no title at all (a made-up product)
    ("Pairs with the COSY WINTER RANGE", ITEM5,
     "names 'COSY WINTER RANGE', which is not the product explained or an event it cites; quote titles exactly as given"),
    # first place claimed for an item ranked 5th
    ("The most likely next buy for the winter", ITEM5, "says 'most likely' of an item that is not ranked first"),
    # an invented popularity claim (the chat's "a best-seller in the shop for several days")
    ("A best-seller in the shop for several days", ITEM5, "says 'best-seller', but no popularity data supports it"),
    # the summary ranks the table's #5 first
    ("Most likely to buy a HOT WATER BOTTLE KEEP CALM next", SUMMARY,
     "says 'Most likely' but does not name the top-ranked item 'HAND WARMER RED LOVE HEART' first"),
    # Chinese: a half-translated title, and a title quoted in part
    ("喜欢手 Warm器设计", ITEM5, "'Warm' is no product title here: quote product titles in full and unchanged"),
    ("喜欢购买带有LED夜灯的红头灯", Facts(titles=["RED TOADSTOOL LED NIGHT LIGHT"]),
     "quotes 'LED' from 'RED TOADSTOOL LED NIGHT LIGHT': in Chinese, quote product titles in full and unchanged"),
    ("最可能购买 HOT WATER BOTTLE KEEP CALM", SUMMARY,
     "says '最可能' but does not name the top-ranked item 'HAND WARMER RED LOVE HEART' first"),
    # a prediction of the next purchase is a ranking claim too (the chat's "it is likely that
    # Customer 15935 will buy a HEART OF WICKER LARGE next" for a lower-ranked item)
    ("It is likely that the customer will buy a HOT WATER BOTTLE KEEP CALM next.", RANKED,
     "says 'likely that the customer will buy' but does not name the top-ranked item "
     "'HAND WARMER RED LOVE HEART' first"),
    ("Their next purchase: HOT WATER BOTTLE KEEP CALM", RANKED,
     "says 'next purchase' but does not name the top-ranked item 'HAND WARMER RED LOVE HEART' first"),
    ("他接下来可能会买一个HOT WATER BOTTLE KEEP CALM。", RANKED,
     "says '接下来可能会买' but does not name the top-ranked item 'HAND WARMER RED LOVE HEART' first"),
    ("客户下一次会购买 HOT WATER BOTTLE KEEP CALM", RANKED,
     "says '下一次会购买' but does not name the top-ranked item 'HAND WARMER RED LOVE HEART' first"),
    ("The customer will probably buy this next", ITEM5,
     "says 'will probably buy this next' of an item that is not ranked first"),
    # direction: a risk word against the band
    ("Low risk: orders every month", Facts(titles=[], direction="high"), "says 'Low risk', but the probability is high"),
    ("Likely to buy it this week", Facts(titles=[], direction="low"), "says 'Likely to buy', but the probability is low"),
    ("High risk after a long gap", Facts(titles=[], direction="medium"), "says 'High risk', but the risk is medium"),
])
def test_a_wrong_sentence_is_caught_with_a_message_naming_the_fault(text: str, facts: Facts, violation: str) -> None:
    assert violation in verify_sentence(text, facts, CATALOGUE)


@pytest.mark.parametrize(("text", "facts"), [
    ("Another novelty warmer for cold days", ITEM5),
    ("Another HAND WARMER style gift, like the 12 bought in order 536365", ITEM5),  # a part of a cited title
    ("Keeps the heart theme of the HAND WARMER UNION JACK (E20)", ITEM5),
    ("Most likely the HAND WARMER RED LOVE HEART, then more hot water bottles", SUMMARY),
    ("Stocking up on winter warmers: 12 HAND WARMER UNION JACK so far", SUMMARY),
    ("Probability 82% (0.82), high risk", Facts(titles=[], numbers=["0.82"], direction="high")),
    ("喜欢 HAND WARMER UNION JACK 这类暖手宝", ITEM5),  # a full title, verbatim, in Chinese
    ("Unlikely to buy soon", Facts(titles=[], direction="low")),
    ("Loves the Halo series", ITEM5),  # one-word catalogue titles are not product mentions
    # a history item named before the top one: the first *ranked* item named is what counts
    ("After the WHITE HANGING HEART T-LIGHT HOLDER, the customer will likely buy the HAND WARMER RED LOVE HEART "
     "next", RANKED),
    ("It is likely that the customer will buy a HAND WARMER RED LOVE HEART next.", RANKED),
    ("They will buy more hand warmers in winter", ITEM5),  # no "next": not a ranking claim
    # a comma-separated list of themes is no product named in other words (a false positive in
    # the chat eval, 2026-12-07: "frequent themes of jumbo, bag, apples, christmas")
    ("Frequent themes: hand, warmer, red, love, heart", Facts(titles=[])),
])
def test_a_right_sentence_passes(text: str, facts: Facts) -> None:
    assert verify_sentence(text, facts, CATALOGUE) == []


def test_numbers_match_to_the_rounding_written() -> None:
    f = Facts(titles=[], numbers=["P 0.8235, 1,250 orders, 35.00 each"])
    assert [f.number_ok(x) for x in ["0.82", "82%", "0.8", "80%", "1,250", "35", "35.00", "0.83", "81%", "36"]] == [
        True, True, True, False, True, True, True, False, False, False]  # 80% is not 82%; 0.8 is 0.82 to 1 place


def test_refs_in_keeps_order_without_repeats() -> None:
    assert refs_in("E3 then E12, again E3; not XE4 or E") == ["E3", "E12"]


def test_a_product_named_in_other_words_is_found() -> None:
    cat = TitleIndex(["REGENCY CAKESTAND 3 TIER", "NATURAL SLATE HEART CHALKBOARD", "SET OF 3 CAKE TINS PANTRY DESIGN"])
    facts = Facts(titles=["NATURAL SLATE HEART CHALKBOARD"])
    assert verify_sentence("The customer bought a regency cakestand 3-tier last month", facts, cat) == [
        "names 'REGENCY CAKESTAND 3 TIER' in other words, which is not the product explained or an event it cites",
        "states 3, which is not in the data; use only numbers shown"]
    # its own (cited) title in other words, or a part of another title, is fine
    assert verify_sentence("Another slate heart chalkboard, natural finish", facts, cat) == []
    assert verify_sentence("Matches the pantry design of the kitchen", facts, cat) == []


def test_a_why_that_only_repeats_its_facts_is_caught() -> None:
    fact = "Customers who bought SET OF 6 SPICE TINS PANTRY DESIGN (E1) often bought this too."
    facts = Facts(titles=["SET OF 6 SPICE TINS PANTRY DESIGN"], refs=["E1"], echo=[fact])
    assert verify_sentence(fact, facts, CATALOGUE) == [
        "repeats the facts it follows; say what the product has in common with the cited events"]
    assert verify_sentence("Another pantry storage piece for the same kitchen shelf", facts, CATALOGUE) == []


def test_a_purchase_the_cited_events_do_not_show_is_caught() -> None:
    # the 1st item's reason: "The customer bought a JUMBO BAG 50'S CHRISTMAS" (the item itself, never bought)
    cat = TitleIndex(["JUMBO BAG 50'S CHRISTMAS", "PAPER CHAIN KIT 50'S CHRISTMAS", "RABBIT NIGHT LIGHT"])
    facts = Facts(titles=["JUMBO BAG 50'S CHRISTMAS", "PAPER CHAIN KIT 50'S CHRISTMAS"], refs=["E19"],
                  event_titles=["PAPER CHAIN KIT 50'S CHRISTMAS"])
    assert verify_sentence("The customer bought a JUMBO BAG 50'S CHRISTMAS for the party", facts, cat) == [
        """says the customer bought "JUMBO BAG 50'S CHRISTMAS", but no cited event is about it """
        """(they are about "PAPER CHAIN KIT 50'S CHRISTMAS")"""]
    rabbit = Facts(titles=["RABBIT NIGHT LIGHT"], event_titles=[])
    assert verify_sentence("The customer bought a rabbit night light before", rabbit, cat) == [
        "says the customer bought 'RABBIT NIGHT LIGHT', but no cited event is about it"]
    # what the cited event shows, and the item itself without a purchase claim, pass
    assert verify_sentence("Bought the PAPER CHAIN KIT 50'S CHRISTMAS; the JUMBO BAG 50'S CHRISTMAS matches it",
                           facts, cat) == []


def test_the_words_of_titles_named_verbatim_do_not_name_a_third_in_other_words() -> None:
    # the chat eval, 2026-12-07: two cited titles together hold every word of a third
    cat = TitleIndex(["SET OF 3 REGENCY CAKE TINS", "REGENCY CAKESTAND 3 TIER", "SET OF 3 CAKE TINS PANTRY DESIGN"])
    facts = Facts(titles=["REGENCY CAKESTAND 3 TIER", "SET OF 3 CAKE TINS PANTRY DESIGN"])
    assert verify_sentence("Both REGENCY CAKESTAND 3 TIER and SET OF 3 CAKE TINS PANTRY DESIGN suit baking", facts,
                           cat) == []
    assert verify_sentence("Also the regency cake tins, a set of 3", facts, cat) == [
        "names 'SET OF 3 REGENCY CAKE TINS' in other words, which is not the product explained or an event it cites"]
