"""Tests for filter.py: the advertisement and fluency filters of SPEC §4 (our design).

Two labelled sets, both written for these tests (no third-party text):
  * ADS / ORDINARY, the TUNING set: 40 advertisements and 42 ordinary texts chosen to be hard for a
    lexical detector (code with licence headers, dictionary entries about "sale", news quoting prices).
    They were written alongside the detector - its phrase lists were grown on them - so scores on them
    are in-sample and prove nothing about new text.
  * HELDOUT_ADS / HELDOUT_ORDINARY: 30 + 30 texts in other niches and wording, written after the
    detector was frozen and before any of them was scored. Measured at the default threshold 0.5:
    precision 1.00 (11 of 11 flagged are ads), recall 0.37 (11 of 30 ads caught), ROC AUC 0.82.
    The honest claim is the weaker one: the detector rarely removes ordinary text, and misses most
    advertising that does not use its phrase lists.
The fluency model is trained on the docstrings of Python's own standard library, read at test time.
"""

import importlib
import inspect
import json
import os
import random

import pytest

import filter as flt
from configurator import UserError

ADS = [
    "Huge Summer Sale! Get 50% off all patio furniture this weekend only. Free shipping on orders over $49. "
    "Shop now at www.patioplanet.com",
    "Looking for a reliable plumber? Call Mike's Plumbing today at (555) 123-4567 for a free estimate. 24/7 "
    "emergency service, licensed and insured. Satisfaction guaranteed!",
    "LIMITED TIME OFFER: Buy one get one free on all vitamins and supplements. Use promo code HEALTH20 at "
    "checkout. Hurry, while supplies last!",
    "Start your free 30-day trial of CloudBooks, the accounting software trusted by over 10,000 small "
    "businesses. No credit card required. Sign up today and simplify your invoicing. Plans from $9.99/month.",
    "Stunning 3 bed, 2 bath family home in a quiet cul-de-sac. Newly renovated kitchen, large backyard, "
    "two-car garage. Priced to sell at $349,900! Contact Jane Miller at jane@sunriserealty.com or call "
    "555-987-6543 to book a viewing.",
    "Cheap meds online!!! Lowest prices guaranteed, no prescription needed. Discreet worldwide delivery. "
    "Order now and save up to 80%. Visit http://best-pharma-deals.biz",
    "Escape to paradise! All-inclusive 7-night Caribbean cruise from just $599 per person. Book now and "
    "kids sail free. Offer ends Friday. Call 1-800-555-0199 or visit our website.",
    "Subscribe to our newsletter and get 10% off your first order! Be the first to know about new arrivals, "
    "exclusive deals and members-only events. Enter your email below. Unsubscribe anytime.",
    "Click here to claim your FREE iPhone! You have been selected as today's lucky winner. Act now, this "
    "offer expires in 10 minutes!!!",
    "Year-end clearance event at Riverside Motors! 0% APR financing for 72 months on select new models. "
    "Trade in your old car and get an extra $2,000 bonus. Visit us at 400 River Road, open 7 days a week.",
    "Tuesday is Taco Day at El Sombrero! $1 tacos all day, $3 margaritas from 4 to 7 pm. Order online for "
    "pickup or delivery. Download our app and earn rewards with every purchase.",
    "Wireless Earbuds Pro - $29.99\nAdd to cart\nBluetooth Speaker Mini - $19.99\nAdd to cart\n"
    "Smart Watch Fit - $49.99\nAdd to cart\nFree shipping on all orders. Shop the best deals today!",
    "New year, new you! Join FitLife Gym for only $10 a month with no joining fee. Personal training "
    "sessions available. Sign up online before January 31 and get your first month free.",
    "Don't miss our free webinar: 5 Secrets to Doubling Your Sales in 30 Days. Register now, seats are "
    "limited! Click the link below to reserve your spot.",
    "Are you overpaying for car insurance? Compare quotes from top providers in minutes and save up to $500 "
    "a year. Get your free quote today, it only takes 2 minutes!",
    "Learn Python in 4 weeks with our bestselling online course. Over 50,000 students enrolled. Lifetime "
    "access, certificate of completion, 30-day money-back guarantee. Enroll now for just $14.99 (regular "
    "price $199).",
    "Book direct and save! Enjoy 20% off our best available rate, complimentary breakfast and free Wi-Fi. "
    "Use code STAY20. Reservations: reservations@grandhotel.com | +44 20 7946 0958",
    "NEW ARRIVALS just dropped. Shop the latest styles in dresses, denim and accessories. Free returns, free "
    "shipping over $75. Follow us on Instagram @styleshop for exclusive discounts.",
    "Need cash fast? Get approved for a personal loan up to $5,000 in minutes. Bad credit OK! Apply now at "
    "www.quickcashloans.net and get your money tomorrow.",
    "Sparkle Cleaning Services - residential and commercial cleaning at affordable prices. Weekly, bi-weekly "
    "or one-time cleans. Call today for a free quote: 555-246-8100. Mention this ad for 15% off your first "
    "clean.",
    "Sleep better tonight. Our memory foam mattress comes with a 100-night risk-free trial and a 10-year "
    "warranty. Now $200 off for a limited time. Order today and get two free pillows.",
    "Tickets are selling fast for the Summer Jam Festival! Three days, 40 artists, one unforgettable "
    "weekend. Early bird passes just $89 until May 1. Get yours now at summerjamfest.com",
    "Turn $250 into $10,000 in one week with our proven crypto trading bot! Thousands of members are already "
    "earning passive income. Join now, spots are limited!",
    "Everything your pet needs, delivered to your door. Save 35% on your first Autoship order of premium dog "
    "food. Shop top brands at low prices. Order by 3 pm for same-day shipping.",
    "Bright Smile Dental is now accepting new patients! Teeth whitening special: $99 (reg. $299). Evening and "
    "weekend appointments available. Call (555) 301-2020 or book online.",
    "Deal of the day: Save $300 on the UltraBook 14 with 16GB RAM and 512GB SSD. Now only $699.99. Limited "
    "stock available, add to cart before it's gone!",
    "Today's top coupons: 25% off sitewide at HomeGoods, $10 off $50 at PetWorld, free delivery at "
    "FreshMart. New codes added daily. Bookmark this page and never pay full price again!",
    "Lose 20 pounds in 30 days without dieting! Doctors hate this one simple trick. Watch the free video now "
    "and order your trial bottle today. Results guaranteed or your money back.",
    "Moving soon? Let the pros handle it. Local and long-distance moves, packing services and storage. "
    "Licensed and insured, with free estimates. Call 555-600-7000 or email info@easymove.com.",
    "Get Office Suite 2021 Professional for only $39.99 - instant download, lifetime license. Thousands of "
    "satisfied customers. Buy now and receive your key by email within minutes.",
    "Sale! Sale! Sale!\nEverything must go - up to 70% off\nSale! Sale! Sale!\nVisit our store on Main "
    "Street this Saturday\nSale! Sale! Sale!",
    "Replace your old windows and save on energy bills. Buy 2 windows, get 1 free plus no interest for 12 "
    "months. Schedule your free in-home consultation today. Offer valid through June 30.",
    "Switch to Nova Mobile and get unlimited talk, text and 20GB of data for just $25/month. Bring your own "
    "phone and keep your number. Switch online in 5 minutes!",
    "The instant bestseller everyone is talking about, now in paperback! Order your copy today from your "
    "favourite bookseller and get a free signed bookplate while supplies last.",
    "File your taxes online for free! Maximum refund guaranteed. Import your W-2 in seconds and e-file "
    "today. Upgrade to Deluxe for just $39 and get expert help.",
    "Send flowers same day! Beautiful bouquets starting at $29.99 with free delivery nationwide. Order by "
    "2 pm. Use code LOVE15 for 15% off Mother's Day arrangements.",
    "BLACK FRIDAY DOORBUSTER!!! 65-inch 4K Smart TV only $299. Plus free soundbar with purchase. In stores "
    "and online. Shop early, quantities limited!",
    "Get 16 free meals plus free shipping with your first box! Fresh ingredients and easy recipes delivered "
    "weekly. Skip or cancel anytime. Claim your offer now.",
    "Homeowners: the government will pay for your solar panels! Find out if you qualify for the new solar "
    "incentive program. Zero upfront cost. Click here to check your eligibility in 60 seconds.",
    "Protect your privacy online with SecureVPN. 68% off the 2-year plan plus 3 extra months free. 30-day "
    "money-back guarantee. Get SecureVPN now: https://securevpn.example/deal",
]

ORDINARY = [
    "The Amazon River in South America is the largest river by discharge volume of water in the world, and "
    "the disputed longest river system in comparison to the Nile. Its headwaters in the Andes were debated "
    "for nearly a century before a survey settled on a glacial stream in southern Peru.",
    "In 2011 the company was acquired by a consortium of investors for $1.2 billion. Its shares, which had "
    "traded at around $40 before the announcement, rose by 12 percent. Analysts attributed the sale to the "
    "firm's declining market share in Europe.",
    "# This program is free software: you can redistribute it and/or modify\n# it under the terms of the GNU "
    "General Public License as published by\n# the Free Software Foundation, either version 3 of the "
    "License, or\n# (at your option) any later version.\n# You should have received a copy of the license "
    "along with this program.  If not, see <https://www.gnu.org/licenses/>.\n#\n# Author: Jane Doe "
    "<jane.doe@example.org>\n\ndef parse_args(argv):\n    parser = make_parser()\n    return parser.parse_args(argv)",
    "def binary_search(items, target):\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + "
    "hi) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < target:\n"
    "            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1",
    '#include <stdio.h>\n\nint main(void) {\n    double price = 19.99;\n    int qty = 3;\n    printf("Total: '
    '$%.2f\\n", price * qty);\n    return 0;\n}',
    "Sale (n.) 1. The act of selling; the transfer of property for a price in money. 2. Opportunity of "
    "selling; demand; market. 3. Public disposal to the highest bidder; auction. 4. A selling of goods at "
    "reduced prices, as at the end of a season.",
    "Bargain (n.) An agreement between parties concerning the sale of property; or a contract by which one "
    "party binds himself to transfer the right to some property for a consideration. (v. i.) To make a "
    "bargain; to make a contract for the exchange of property or services.",
    "Ephemeral (adj.) Beginning and ending in a day; continuing or existing one day only; short-lived; "
    "existing or continuing for a short time only. Syn: transitory, fleeting, evanescent.",
    "Q: How do I undo the most recent local commits in Git?\nA: Use git reset --soft HEAD~1 to keep your "
    "changes staged, or git reset --hard HEAD~1 to discard them entirely. See the documentation at "
    "https://git-scm.com/docs/git-reset for the details of each mode.",
    "Q: Why does my Python script print None after the function output?\nA: Your function prints a value but "
    "does not return one, so the call evaluates to None, and then you print that too. Either return the "
    "value and print it at the call site, or call the function without wrapping it in print().",
    "Q: How do I change the default browser on Windows 11?\nA: Open Settings, click Apps, then Default apps, "
    "and search for the browser you want. Click its name and then click Set default at the top of the page.",
    "Preheat the oven to 180 degrees. Cream the butter and sugar until pale, then beat in the eggs one at a "
    "time. Fold in the flour and baking powder, pour the batter into a lined tin and bake for 25 minutes, "
    "until a skewer comes out clean.",
    "It was late in the afternoon when the carriage at last turned into the lane, and Margaret, who had been "
    "watching from the window for nearly an hour, could not quite conceal her relief. Her brother stepped "
    "down first, dusty and tired, and offered his hand to their aunt with the grave courtesy he always "
    "showed her.",
    "Consumer prices rose 3.2 percent in the year to March, the statistics office said on Tuesday, as higher "
    "energy and food costs offset a slowdown in the price of clothing. The central bank is expected to keep "
    "interest rates unchanged at its meeting next week.",
    "We study the convergence of stochastic gradient descent on non-convex objectives satisfying the "
    "Polyak-Lojasiewicz condition. Under standard smoothness assumptions we prove a linear rate up to a noise "
    "floor proportional to the step size, and we show experimentally that the bound is tight.",
    "To report a bug, open an issue on the project's tracker at https://github.com/example/project/issues "
    "and include the version number, your operating system and a minimal example. Questions about usage are "
    "better asked on the mailing list, which you can subscribe to from the project website.",
    "I've had the same hiking boots for six years and they are finally falling apart. The soles are fine but "
    "the leather has cracked at the toe. Has anyone had luck with resoling services, or is it better to just "
    "replace them at this point?",
    "The Treaty of Westphalia, signed in 1648, ended the Thirty Years' War in the Holy Roman Empire and the "
    "Eighty Years' War between Spain and the Dutch Republic. It is often cited as the origin of the modern "
    "system of sovereign states.",
    "function debounce(fn, wait) {\n  let timer = null;\n  return function (...args) {\n    clearTimeout(timer);"
    "\n    timer = setTimeout(() => fn.apply(this, args), wait);\n  };\n}",
    "name: build\non: [push, pull_request]\njobs:\n  test:\n    runs-on: ubuntu-latest\n    steps:\n      - "
    "uses: actions/checkout@v4\n      - run: pip install -r requirements.txt\n      - run: pytest -q",
    "free software: Software that everyone is free to copy, redistribute and modify. The term was promoted "
    "by the Free Software Foundation, which distinguishes freedom from price: free software may be sold, and "
    "much of it is distributed at no cost.",
    "hack mode n. A Zen-like state of total focus on The Problem that may be achieved when one is hacking. "
    "The ability to enter such concentration at will correlates strongly with experience, and it is one of "
    "the most important skills a new programmer learns.",
    "Ada Lovelace (1815-1852) was an English mathematician and writer, chiefly known for her work on Charles "
    "Babbage's proposed mechanical general-purpose computer, the Analytical Engine. She was the first to "
    "recognise that the machine had applications beyond pure calculation.",
    "When the price of a good falls, consumers typically buy more of it, both because it is now cheaper "
    "relative to other goods and because their real income has risen. This inverse relationship between "
    "price and quantity demanded is known as the law of demand.",
    "Dear Tom, thank you for the photographs from the wedding. The one of Grandma dancing with the best man "
    "made everyone laugh at dinner. We are hoping to visit in the spring if the weather improves, and the "
    "children are already asking about your dog.",
    "SELECT customer_id, SUM(amount) AS total_spent\nFROM orders\nWHERE order_date >= '2023-01-01'\nGROUP BY "
    "customer_id\nHAVING SUM(amount) > 100\nORDER BY total_spent DESC;",
    "Q: What is the best data structure for storing product prices that change over time?\nA: If you mostly "
    "query the price at a given date, store one row per (product, valid_from) and look up the latest row not "
    "after the date; an index on both columns makes this a fast range scan.",
    "We reached the village just before dusk. The road had narrowed to a track an hour earlier, and the last "
    "few kilometres were walked beside the mule that carried our bags. An old woman showed us to a room above "
    "the bakery, where the smell of bread woke us long before sunrise.",
    "The tenant shall pay the rent on the first day of each month without deduction. If the rent remains "
    "unpaid fourteen days after it is due, the landlord may recover possession of the premises in accordance "
    "with the provisions of this agreement.",
    "Type 2 diabetes is characterised by insulin resistance and a relative deficiency of insulin secretion. "
    "First-line treatment usually combines lifestyle changes, such as diet and exercise, with metformin, "
    "which lowers glucose production in the liver.",
    "Water molecules are polar: the oxygen atom draws electron density away from the two hydrogen atoms, "
    "leaving it with a partial negative charge. Hydrogen bonds between neighbouring molecules explain "
    "water's unusually high boiling point.",
    '#!/bin/sh\nset -e\nfor f in *.txt; do\n    wc -l "$f"\ndone | sort -n | tail -5',
    "Return a new list containing all items from the iterable in ascending order.\n\nA custom key function "
    "can be supplied to customize the sort order, and the reverse flag can be set to request the result in "
    "descending order.",
    "Q: Why is the sum of the first n odd numbers equal to n squared?\nA: Arrange the odd numbers as L-shaped "
    "layers around a corner: each new odd number 2k-1 adds exactly the cells needed to grow a (k-1) by (k-1) "
    "square into a k by k square.",
    "The home side took the lead in the 23rd minute when Okafor headed in a corner, but the visitors "
    "equalised shortly after half-time. A late penalty, awarded after a lengthy video review, settled the "
    "match 2-1 and lifted the club to third in the table.",
    "I bought this kettle last winter and it has been fine, though the lid hinge feels flimsy and the water "
    "gauge is hard to read. It boils quickly and switches off reliably. For the price it is acceptable, but "
    "I would look at other models first.",
    "Version 2.4.0\n- Fixed a crash when the configuration file is empty.\n- Added a --quiet option to "
    "suppress progress output.\n- Dropped support for Python 3.7.\n- Updated the documentation for the "
    "export command.",
    "The river keeps no memory of the rain,\nit carries every cloud down to the sea;\nand on the bank the "
    "willows bend again\nto write their names on water, patiently.",
    "A light-year is the distance light travels in one Julian year, about 9.46 trillion kilometres. The "
    "nearest star to the Sun, Proxima Centauri, lies about 4.24 light-years away, so the light we see "
    "tonight left it more than four years ago.",
    "Founded in 1994 as an online bookstore, the company expanded into electronics, clothing and groceries, "
    "and later into cloud computing. Its retail business operates on thin margins, while most of its "
    "operating profit comes from web services.",
    "Thanks for the quick reply, that fixed it. For anyone finding this thread later: the problem was a "
    "stale lock file in the cache directory. Deleting it and restarting the service was enough.\n--\n"
    "Peter Novak | peter.novak@example.net",
    "Grocery list for the week: two loaves of bread, a dozen eggs, milk, apples, rice, a bag of onions and "
    "coffee. The market on the corner had tomatoes at half the supermarket price, so I bought three kilos "
    "for the sauce.",
]

HELDOUT_ADS = [
    "Struggling with Spanish verbs? Our native tutors meet you online twice a week, at times that suit you. "
    "The first lesson costs nothing, and packages start at 12 euros an hour. Message us to arrange a trial.",
    "Fresh sourdough, croissants and cinnamon knots baked every morning at Harbour Street Bakery. Pre-order "
    "by 8 pm and pick up warm loaves on your way to work. Ask about our weekly bread subscription.",
    "Desks available at The Loft coworking space: fast fibre, unlimited coffee, meeting rooms and a quiet "
    "phone booth. Day passes 15 pounds, monthly memberships 180 pounds. Come in for a tour this week.",
    "Busy schedule? Paws & Go walks your dog while you work. Insured, background-checked walkers, GPS "
    "updates after every walk. First walk half price for new clients. Text Laura on 07700 900123.",
    "Always wanted to play guitar? Beginner group lessons every Thursday evening at the community music "
    "studio. Instruments provided. Only eight places per class, so reserve yours soon.",
    "Hear every word again. The new NanoEar hearing aid is almost invisible and recharges overnight. Book a "
    "free hearing test at one of our 200 clinics and try it at home for 30 days.",
    "DentFlow takes the paperwork out of running a dental practice: online booking, automatic reminders and "
    "insurance claims in one dashboard. Request a demo and see why 3,000 clinics made the switch.",
    "Gleam Auto Spa: hand wash and interior vacuum from $25. Ceramic coating packages now 30% off through "
    "the end of the month. Drive in, no appointment needed, open daily 8 to 6.",
    "Capture your big day with natural, unposed photographs. Wedding packages include a second shooter, an "
    "online gallery and a printed album. Limited 2027 dates remain - enquire today for availability.",
    "This episode is brought to you by Brightmug, the smart mug that keeps your coffee at the perfect "
    "temperature all morning. Go to brightmug.com slash podcast and use code LISTEN for 20 percent off.",
    "Our pick of the best air fryers this year: the CrispMax 5L is the one to buy, now down to $79 from $129 "
    "at major retailers. Grab it before the price goes back up.",
    "Bedbugs, ants or mice? PestAway technicians treat your home the same day, with pet-safe products and a "
    "90-day guarantee. Call now for a no-obligation inspection.",
    "Ride further for less. The Volta City e-bike, 80 km range, hydraulic brakes, now just 999 dollars with "
    "free home delivery and assembly. Test ride one at your nearest showroom.",
    "Tickets for DataConf 2027 are on sale! Two days of talks from industry leaders, hands-on workshops and "
    "networking drinks. Early-bird pricing ends on Friday - secure your pass now.",
    "Dreaming of a new kitchen? Oak & Stone design, supply and fit complete kitchens in as little as three "
    "weeks. Visit our showroom or book a home design visit - it's free and there's no pressure to buy.",
    "Prescription glasses from just $39, including lenses and anti-glare coating. Try five frames at home "
    "before you decide. Order online in minutes and enjoy free returns.",
    "Unwind on a five-day yoga retreat in the hills of Umbria. Daily classes, vegetarian meals and a pool "
    "with a view. Only 12 rooms available for the September retreat. Book your place today.",
    "Cash for gold, watches and electronics! Best prices in town paid on the spot at Quick Pawn, corner of "
    "5th and Main. Instant loans against your valuables, no credit checks.",
    "Learn a language in 10 minutes a day. Download LinguaPop free and unlock every course with Premium - "
    "your first week is on us. Join 20 million learners worldwide.",
    "Join the Cellar Club and receive six hand-picked wines every month, delivered to your door. Members save "
    "25% on every bottle. Cancel anytime. First case only $49.",
    "Furnish your new flat without the upfront cost. Rent sofas, beds and desks from 15 dollars a month, "
    "swap items when your style changes. Delivery in 48 hours.",
    "Get top grades this exam season! BrightPath tutoring centre offers one-to-one maths and science "
    "tutoring for ages 11-18. Enrol before 1 March and receive two sessions free.",
    "Introducing Nuit Blanche, the new fragrance by Maison Arel. Notes of fig, cedar and white musk. "
    "Available now at selected department stores and online. Discover the collection.",
    "Conquer the kingdom! Build your army, forge alliances and battle players worldwide in Realm Clash, the "
    "strategy game everyone is playing. Free to play - install now and claim 500 bonus gems.",
    "Sponsored: Is your retirement on track? Our free guide explains five mistakes that cost savers "
    "thousands. Enter your email to download it instantly.",
    "Two-bedroom apartment for rent in Riverside, fully furnished, balcony, parking space. $1,650 per month, "
    "utilities included. Available from June. Call Sam at 555-212-7788 to arrange a viewing.",
    "Upgrade your home internet to gigabit fibre for the price of your current plan. No installation fee, no "
    "contract. Check availability at your address now!",
    "Handmade leather wallets, crafted in small batches and built to last a lifetime. Free engraving on all "
    "orders this week. Shop the collection at our online store.",
    "Solar roof tiles that pay for themselves. Get a personalised savings estimate in under two minutes and "
    "lock in the current government rebate before it ends.",
    "Spring clean-up special! Lawn mowing, hedge trimming and garden waste removal from $40 per visit. "
    "Family-owned and fully insured. Call GreenThumb today for a free quote.",
]

HELDOUT_ORDINARY = [
    "The Finance Ministry announced on Monday that the standard rate of value-added tax will rise from 20 to "
    "21 percent next January. Officials said the change would raise about 3 billion euros a year, most of "
    "which is earmarked for hospitals.",
    "Re: noise from the fan on my laptop. I tried the vendor's BIOS update and the fan still spins up when "
    "the browser is open. Cleaning the vents helped a little. Has anyone compared the 2023 and 2024 models?",
    "In the medieval fairs of Champagne, merchants from Italy and Flanders met to trade cloth, spices and "
    "silver. The fairs rotated between four towns and were protected by the counts, who guaranteed safe "
    "conduct to travellers.",
    "Nike was founded in 1964 as Blue Ribbon Sports by Bill Bowerman and Phil Knight, and became Nike, Inc. "
    "in 1971. The company takes its name from the Greek goddess of victory.",
    "v3.1.0 (2026-10-02)\n* The free tier now allows five projects instead of three.\n* Fixed the export of "
    "dates in CSV files.\n* Removed the deprecated --legacy flag.",
    "Refunds. If you cancel within 14 days of purchase you are entitled to a full refund of the fee paid. "
    "After that period, refunds are issued only where the service was not provided as described.",
    "Retail sales over the Black Friday weekend rose 4 percent compared with last year, according to an "
    "industry survey, while the number of shoppers visiting physical stores fell for the third year running.",
    "Far out in the uncharted backwaters of the harbour, a single gull\nhung on the wind above the pier, "
    "patient as a question,\nand the tide went out beneath it without a sound.",
    "12. Nf3 Bg4 13. h3 Bh5 14. g4 Bg6 15. Nh4. White gains space on the kingside, but the pawn on g4 "
    "becomes a target; Black's best reply is 15...Nd7, preparing f5.",
    "Tomorrow: cloudy at first with showers spreading from the west by midday, some heavy. Highs of 14 "
    "degrees, falling to 6 overnight. Winds strong at times on exposed coasts.",
    "Dear customer service team, I ordered a blender on the 3rd and received a toaster instead. I have "
    "attached a photo of the packing slip. Could you tell me how to return it and when the right item will "
    "be sent?",
    "## Installation\n\n    pip install tinyplot\n\nThen import it with `import tinyplot as tp`. The source "
    "lives at https://github.com/example/tinyplot and bug reports are welcome there.",
    "Every Sunday I go down to the flea market by the canal. Last week I found a box of old postcards for "
    "two euros, most of them sent from seaside towns in the 1950s, with short notes about the weather.",
    "Advertising in the nineteenth century relied on posters, handbills and newspaper columns. Slogans such "
    "as 'buy now' appeared on patent medicines long before consumer protection laws restricted such claims.",
    "We present a method for estimating the depth of a scene from a single image. The network is trained "
    "without labels on stereo video, and it improves the error on a standard benchmark by 12 percent.",
    "Margaret Ellison, who taught chemistry at the village school for thirty-one years, died peacefully on "
    "Tuesday at the age of 88. She is survived by her two sons and five grandchildren.",
    "The visitors dominated possession in the first half but could not find a way through. The only goal "
    "came in the 78th minute, a deflected shot from the edge of the area that wrong-footed the keeper.",
    "How long does delivery take? Orders placed before noon are usually dispatched the same day. Delivery "
    "within the country takes two to four working days; international parcels can take up to three weeks.",
    "The castle museum is open from April to October, Tuesday to Sunday. Admission is $15 for adults and $8 "
    "for children; the gardens can be visited without a ticket.",
    "Because of works on the bridge, bus route 14 will be diverted via Station Road from 6 to 19 March. The "
    "stops on Mill Lane will not be served during this period.",
    "The council approved a budget of 42 million pounds for the coming year. Councillors debated the cost "
    "of road repairs at length, and a proposal to cut library hours was rejected by nine votes to four.",
    "When the user clicks checkout, validate the cart on the server before creating the order: prices may "
    "have changed since the page loaded. Wrap the stock update and the order insert in one transaction.",
    "The market square was loud with the calls of traders. A woman selling apples held one up to the light "
    "as if it were a jewel, and the boy beside her counted coins into a tin with great seriousness.",
    "LOST: grey tabby cat, answers to Milo, last seen near Elm Park on Saturday evening. He is microchipped "
    "and a little shy. If you see him, please call 555-430-1182. Thank you.",
    "Take one tablet twice a day with food. Do not exceed the stated dose. If you miss a dose, take it as "
    "soon as you remember, unless it is almost time for the next one.",
    "The first coupons are usually credited to Coca-Cola, which in 1887 mailed tickets for a free glass of "
    "its drink. By the 1930s, coupons had become a common way for shoppers to stretch their budgets.",
    "def total_price(items, discount=0.0):\n    subtotal = sum(i.price * i.qty for i in items)\n    return "
    "round(subtotal * (1 - discount), 2)",
    "I bought these headphones three months ago. The sound is good and the battery lasts a week, but the "
    "ear pads are already peeling. Customer support replied quickly and sent replacements.",
    "Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, water is "
    "split and oxygen released; the Calvin cycle then fixes carbon dioxide into sugars.",
    "Minutes of the residents' association meeting, 4 November. Present: 14 members. The treasurer reported "
    "a balance of 2,310 pounds. It was agreed to repaint the playground railings in spring.",
]


# ---------------------------------------------------------------------------------------------------
# Advertisements


def precision_recall(ads, ordinary, threshold=flt.FilterConfig.ad_threshold):
    tp = sum(flt.ad_score(t) >= threshold for t in ads)
    fp = sum(flt.ad_score(t) >= threshold for t in ordinary)
    return tp / max(1, tp + fp), tp / len(ads)


def test_ad_filter_on_held_out_text():
    """Held-out (written after the detector, never tuned on): measured precision 1.00, recall 0.37, AUC 0.82.
    Claimed, with a little room: precision >= 0.9, recall >= 0.3, and ads rank above ordinary text
    (AUC >= 0.75). Not claimed: that most advertising is caught."""
    precision, recall = precision_recall(HELDOUT_ADS, HELDOUT_ORDINARY)
    ads = [flt.ad_score(t) for t in HELDOUT_ADS]
    ordinary = [flt.ad_score(t) for t in HELDOUT_ORDINARY]
    auc = sum((a > o) + 0.5 * (a == o) for a in ads for o in ordinary) / (len(ads) * len(ordinary))
    assert len(HELDOUT_ADS) == len(HELDOUT_ORDINARY) == 30
    assert precision >= 0.9 and recall >= 0.3 and auc >= 0.75, (precision, recall, auc)


def test_ad_filter_on_its_tuning_set():
    """In-sample regression guard only: the phrase lists were grown on these texts (all 40 ads caught,
    none of the 42 ordinary texts flagged when they were frozen)."""
    precision, recall = precision_recall(ADS, ORDINARY)
    assert len(ADS) == 40 and len(ORDINARY) >= 40
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)


def test_ad_score_is_a_probability_and_explains_itself():
    for text in ADS + ORDINARY + ["", "!!!", "$" * 50, "BUY NOW " * 200]:
        assert 0.0 <= flt.ad_score(text) <= 1.0
    signals = flt.ad_signals(ADS[0])
    assert signals["call_to_action"] > 0 and signals["price"] > 0 and signals["url"] > 0
    assert flt.noisy_or({"a": 0.5, "b": 0.5}) == pytest.approx(0.75)  # 1 - (1 - .5)(1 - .5)


# ---------------------------------------------------------------------------------------------------
# Fluency: a character 5-gram trained on the standard library's docstrings

STDLIB = ["argparse", "collections", "json", "pathlib", "textwrap", "inspect", "logging", "email.message",
          "http.client", "urllib.parse", "unittest", "functools", "itertools", "random",
          "statistics", "decimal", "fractions", "datetime", "calendar", "string", "re", "subprocess",
          "shutil", "tarfile", "zipfile", "csv", "configparser", "heapq", "bisect", "threading", "socket",
          "pdb", "doctest", "difflib", "smtplib", "sqlite3", "tempfile", "glob", "copy", "pickle", "gzip",
          "hashlib", "secrets", "uuid", "optparse", "locale", "gettext", "codecs", "pprint", "enum",
          "contextlib", "dataclasses", "weakref", "ftplib", "imaplib", "mailbox", "tkinter", "turtle", "ast"]


def stdlib_docstrings():
    """Distinct docstrings (>= 200 characters) of modules and their public members, in a fixed order."""
    seen, docs = set(), []
    for name in STDLIB:
        try:
            module = importlib.import_module(name)
        except ImportError:  # e.g. tkinter missing: fewer docs, same test
            continue
        objects = [module] + [getattr(module, n) for n in sorted(vars(module)) if not n.startswith("_")]
        for obj in objects:
            doc = inspect.getdoc(obj) if (inspect.ismodule(obj) or inspect.isclass(obj)
                                          or inspect.isroutine(obj)) else None
            if doc and len(doc) >= 200 and doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return docs


@pytest.fixture(scope="module")
def fluency_setup():
    docs = stdlib_docstrings()
    random.Random(0).shuffle(docs)
    test_docs = [d for d in docs[:200] if len(d.split()) >= 30][:120]
    train = docs[200:]
    train_text, size = [], 0
    for d in train:  # ~400 KB of clean text keeps training fast
        train_text.append(d)
        size += len(d)
        if size > 400_000:
            break
    return flt.train_char_lm(train_text, order=5), test_docs


def word_shuffled(text, seed):
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


def char_noised(text, seed, rate=0.1):
    rng = random.Random(seed)
    chars = list(text)
    for i in rng.sample(range(len(chars)), k=max(1, int(rate * len(chars)))):
        chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(chars)


def test_model_is_a_distribution(fluency_setup):
    """After any history, the probabilities of all characters seen in training (BOS/EOS marks included)
    plus the one 'unknown' symbol sum to exactly 1: the Kneser-Ney interpolation loses no mass."""
    model, _ = fluency_setup
    known = sorted(model["levels"][1][0])  # the unigram level's keys: every character seen
    for history in ("The quick brown fo", "def f(x):\n    ret", "zqxj"):
        total = sum(flt.char_probs(model, history + c)[len(history)] for c in known)
        unknown = flt.char_probs(model, history + "\u4e00")[len(history)]  # a character never seen
        assert 0 < unknown < 1e-3
        assert total + unknown == pytest.approx(1.0, abs=1e-9)


def test_shuffled_or_noised_text_is_less_fluent(fluency_setup):
    model, docs = fluency_setup
    assert len(docs) >= 80
    shuffled_worse = noised_worse = 0
    for i, doc in enumerate(docs):
        original = " ".join(doc.split())  # same whitespace as the shuffled version: compare words only
        if flt.bits_per_char(model, word_shuffled(doc, i)) > flt.bits_per_char(model, original):
            shuffled_worse += 1
        if flt.bits_per_char(model, char_noised(doc, i)) > flt.bits_per_char(model, doc):
            noised_worse += 1
    assert shuffled_worse / len(docs) >= 0.95, shuffled_worse / len(docs)
    assert noised_worse / len(docs) >= 0.95, noised_worse / len(docs)


def test_fluency_percentile_is_per_domain():
    """Each domain loses its own least fluent 15%, whatever its perplexity level."""
    prose = [t for t in ORDINARY if "\n" not in t][:20]
    code = [f"def f{i}(x):\n    y = x * {i} + {i % 7}\n    return y - {i}" for i in range(20)]
    docs = [({"text": t}, "prose", f"p:{i}") for i, t in enumerate(prose)]
    docs += [({"text": t}, "code", f"c:{i}") for i, t in enumerate(code)]
    kept, removed = flt.filter_documents(docs, flt.FilterConfig(ads=False, fluency=True))
    for domain, n in (("prose", len(prose)), ("code", len(code))):
        gone = [r for r in removed if r["domain"] == domain]
        assert all(r["filter"]["removed_by"] == "fluency" for r in gone)
        assert len(gone) == pytest.approx(0.15 * n, abs=1)


# ---------------------------------------------------------------------------------------------------
# The command line: nothing lost, counts add up


def write_input(path):
    lines = []
    for i, text in enumerate(ADS[:12] + ORDINARY[:28]):
        if i % 3 == 0:
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaC4"}}))
        elif i % 3 == 1:
            lines.append(json.dumps({"text": text, "domain": "wiki"}))
        else:
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": "RedPajamaCommonCrawl"}}))
    lines.insert(3, '{"text": "this line is cut in the midd')  # line 4: not JSON
    lines.insert(7, '["a list, not an object"]')  # line 8: JSON, but not a document
    with open(path, "wb") as f:
        f.write(("\n".join(lines) + "\n").encode())
        f.write(b'{"text": "caf\xe9 au lait, written in latin-1", "domain": "wiki"}\n')  # not UTF-8
    return 40 + 1  # valid documents


def test_cli_counts_add_up(tmp_path, capsys):
    src = tmp_path / "docs.jsonl"
    n_valid = write_input(src)
    ref = tmp_path / "ref.txt"
    ref.write_text("\n\n".join(ORDINARY[28:]))
    report = flt.main([f"--input={src}", f"--out={tmp_path / 'out'}", f"--reference={ref}"])
    kept = [json.loads(x) for x in open(tmp_path / "out" / "kept.jsonl")]
    removed = [json.loads(x) for x in open(tmp_path / "out" / "removed.jsonl")]
    assert len(kept) + len(removed) == n_valid == report["documents"]
    assert report["kept"] == len(kept) and report["removed"] == len(removed)
    assert report["bad_lines"]["count"] == 2
    assert report["bad_lines"]["where"][0].startswith(f"{src}:4:")
    assert report["bad_lines"]["where"][1].startswith(f"{src}:8:")
    assert report["non_utf8"]["count"] == 1 and any("\ufffd" in r["text"] for r in kept + removed)
    assert set(report["domains"]) == {"c4", "wiki", "commoncrawl"}
    for d in report["domains"].values():
        assert d["documents"] == d["kept"]["documents"] + sum(r["documents"] for r in d["removed"].values())
        assert d["words"] == d["kept"]["words"] + sum(r["words"] for r in d["removed"].values())
    assert sum(d["removed"]["ads"]["documents"] for d in report["domains"].values()) >= 10
    for rec in removed:
        reason = rec["filter"]["removed_by"]
        assert reason in ("ads", "fluency")
        assert "ad_score" in rec["filter"] and (reason == "ads" or "bits_per_char" in rec["filter"])
    assert json.load(open(tmp_path / "out" / "report.json")) == json.loads(json.dumps(report))
    printed = capsys.readouterr().out
    assert "removed by ads" in printed and "2 bad line(s) skipped" in printed and "docs.jsonl:4" in printed


def test_cli_text_input_and_errors(tmp_path):
    src = tmp_path / "forum.txt"
    src.write_text(ORDINARY[16] + "\n\n\n" + ADS[8] + "\n  \n" + ORDINARY[24] + "\n")
    report = flt.main([f"--input={src}", f"--out={tmp_path / 'o'}", "--fluency=False"])
    assert report["documents"] == 3 and report["removed"] == 1
    removed = json.loads(open(tmp_path / "o" / "removed.jsonl").read())
    assert removed["source"] == f"{src}:4" and removed["domain"] == "forum"
    with pytest.raises(UserError, match="input file .*nope.jsonl not found"):
        flt.main([f"--input={tmp_path / 'nope.jsonl'}", f"--out={tmp_path / 'o'}"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"expected a \.jsonl, \.jsonl\.zst or \.txt file"):
        flt.main([f"--input={tmp_path / 'x.csv'}", f"--out={tmp_path / 'o'}"])


# ---------------------------------------------------------------------------------------------------
# Nothing lost: the input is never touched, every document lands in kept or removed


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_lone_surrogate_is_scored_and_written_back_unchanged(tmp_path):
    """A record holding "\\ud800" (valid JSON, not encodable as UTF-8) used to abort the write after
    kept.jsonl was replaced and with removed.jsonl half written. Now it is scored like any text, lands in
    kept or removed with the same string, and the old outputs are replaced only by complete new ones."""
    src = tmp_path / "in.jsonl"
    texts = ORDINARY[:20] + ADS[:5]
    texts.insert(7, "a lone \ud800 surrogate in an otherwise ordinary sentence about rivers")
    src.write_text("".join(json.dumps({"text": t, "domain": "web"}) + "\n" for t in texts))
    out = tmp_path / "out"
    out.mkdir()
    for name in ("kept.jsonl", "removed.jsonl", "report.json"):
        (out / name).write_text("an older result\n")
    source = src.read_bytes()
    report = flt.main([f"--input={src}", f"--out={out}"])
    kept = [json.loads(x) for x in open(out / "kept.jsonl")]
    removed = [json.loads(x) for x in open(out / "removed.jsonl")]
    assert sorted(r["text"] for r in kept + removed) == sorted(texts)  # each exactly once, unchanged
    assert report["documents"] == len(texts) == report["kept"] + report["removed"]
    assert report["lone_surrogates"] == 1
    assert json.load(open(out / "report.json"))["kept"] == len(kept)
    assert src.read_bytes() == source


def test_out_that_would_overwrite_the_input_is_refused(tmp_path):
    """Filtering "in place" (--input=DIR/kept.jsonl --out=DIR) used to overwrite the input first."""
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ORDINARY[:10]))
    before = snapshot(tmp_path)
    with pytest.raises(UserError, match="contains the input --input="):
        flt.main([f"--input={tmp_path / 'kept.jsonl'}", f"--out={tmp_path}"])
    assert snapshot(tmp_path) == before


def test_the_three_outputs_are_replaced_together_or_not_at_all(tmp_path, monkeypatch):
    """kept.jsonl, removed.jsonl and report.json are one result: a failure while writing removed.jsonl
    used to leave a new kept.jsonl beside the old removed.jsonl. Now the old folder stays byte-identical."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ORDINARY[:10] + ADS[:3]))
    out = tmp_path / "out"
    flt.main([f"--input={src}", f"--out={out}", "--fluency=False"])
    before = snapshot(out)
    real, calls = flt.write_jsonl, []

    def fail_on_the_second(path, records):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, records)
    monkeypatch.setattr(flt, "write_jsonl", fail_on_the_second)
    with pytest.raises(OSError, match="disk full"):
        flt.main([f"--input={src}", f"--out={out}", "--ads=False"])
    assert snapshot(out) == before and sorted(os.listdir(tmp_path)) == ["in.jsonl", "out"]


def test_out_holding_other_files_is_refused(tmp_path, monkeypatch):
    """The result replaces the whole --out folder, so a folder with anything else in it is refused."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ORDINARY[:10]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"--out=.*holds files that are not a filter result \(notes\.txt\)"):
        flt.main([f"--input={src}", f"--out={out}"])
    assert snapshot(out) == {"notes.txt": b"mine"}
    # ... also when the file arrives while the documents are being scored (checked again before the swap)
    (out / "notes.txt").unlink()
    real = flt.filter_documents

    def scoring_meanwhile(*args):
        (out / "notes.txt").write_text("mine")
        return real(*args)
    monkeypatch.setattr(flt, "filter_documents", scoring_meanwhile)
    with pytest.raises(UserError, match=r"holds files that are not a filter result \(notes\.txt\)"):
        flt.main([f"--input={src}", f"--out={out}"])
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_empty_reference_and_order_0_are_user_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in ORDINARY[:10]))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UserError, match="--reference=.*holds no text"):  # was: fluency silently off
        flt.main([f"--input={src}", f"--out={tmp_path / 'o'}", f"--reference={tmp_path / 'empty.txt'}"])
    with pytest.raises(UserError, match="--order=0"):  # was: KeyError: 1
        flt.main([f"--input={src}", f"--out={tmp_path / 'o'}", "--order=0"])
    assert not (tmp_path / "o").exists()


def test_cli_user_error_is_one_line_exit_2(tmp_path, capsys):
    from configurator import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(flt.main, [f"--input={tmp_path / 'nope.jsonl'}", f"--out={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "nope.jsonl not found" in err
