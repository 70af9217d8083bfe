"""Writes world-capitals.csv beside this file: every country below in every template.

    python manifests/prompts/make_world_capitals.py

The countries are the 193 UN member states, Vatican City, Kosovo and Taiwan; the README's
"Prompt datasets" section gives the conventions (which capital where a country has several,
spellings, regions). A test checks that this script reproduces the committed CSV.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from pathlib import Path

CSV_PATH = Path(__file__).with_name("world-capitals.csv")
COLUMNS = ("id", "text", "answer", "template", "group")

# Template name -> wording; {country} reads as in English after "of" ("the Netherlands").
TEMPLATES = {
    "called-simply": "Give the city name only, plain text. The capital of {country} is called simply",
    "qa": "Q: What is the capital of {country}? A:",
    "plain": "The capital of {country} is",
}

# (country, capital) by region: the UN M49 continents, the Americas split into North America
# (with Central America and the Caribbean) and South America.
COUNTRIES: dict[str, list[tuple[str, str]]] = {
    "Africa": [
        ("Algeria", "Algiers"),
        ("Angola", "Luanda"),
        ("Benin", "Porto-Novo"),
        ("Botswana", "Gaborone"),
        ("Burkina Faso", "Ouagadougou"),
        ("Burundi", "Gitega"),
        ("Cameroon", "Yaoundé"),
        ("Cape Verde", "Praia"),
        ("the Central African Republic", "Bangui"),
        ("Chad", "N'Djamena"),
        ("the Comoros", "Moroni"),
        ("the Democratic Republic of the Congo", "Kinshasa"),
        ("the Republic of the Congo", "Brazzaville"),
        ("Djibouti", "Djibouti"),
        ("Egypt", "Cairo"),
        ("Equatorial Guinea", "Malabo"),
        ("Eritrea", "Asmara"),
        ("Eswatini", "Mbabane"),
        ("Ethiopia", "Addis Ababa"),
        ("Gabon", "Libreville"),
        ("the Gambia", "Banjul"),
        ("Ghana", "Accra"),
        ("Guinea", "Conakry"),
        ("Guinea-Bissau", "Bissau"),
        ("Ivory Coast", "Yamoussoukro"),
        ("Kenya", "Nairobi"),
        ("Lesotho", "Maseru"),
        ("Liberia", "Monrovia"),
        ("Libya", "Tripoli"),
        ("Madagascar", "Antananarivo"),
        ("Malawi", "Lilongwe"),
        ("Mali", "Bamako"),
        ("Mauritania", "Nouakchott"),
        ("Mauritius", "Port Louis"),
        ("Morocco", "Rabat"),
        ("Mozambique", "Maputo"),
        ("Namibia", "Windhoek"),
        ("Niger", "Niamey"),
        ("Nigeria", "Abuja"),
        ("Rwanda", "Kigali"),
        ("São Tomé and Príncipe", "São Tomé"),
        ("Senegal", "Dakar"),
        ("Seychelles", "Victoria"),
        ("Sierra Leone", "Freetown"),
        ("Somalia", "Mogadishu"),
        ("South Africa", "Pretoria"),
        ("South Sudan", "Juba"),
        ("Sudan", "Khartoum"),
        ("Tanzania", "Dodoma"),
        ("Togo", "Lomé"),
        ("Tunisia", "Tunis"),
        ("Uganda", "Kampala"),
        ("Zambia", "Lusaka"),
        ("Zimbabwe", "Harare"),
    ],
    "North America": [
        ("Antigua and Barbuda", "St. John's"),
        ("the Bahamas", "Nassau"),
        ("Barbados", "Bridgetown"),
        ("Belize", "Belmopan"),
        ("Canada", "Ottawa"),
        ("Costa Rica", "San José"),
        ("Cuba", "Havana"),
        ("Dominica", "Roseau"),
        ("the Dominican Republic", "Santo Domingo"),
        ("El Salvador", "San Salvador"),
        ("Grenada", "St. George's"),
        ("Guatemala", "Guatemala City"),
        ("Haiti", "Port-au-Prince"),
        ("Honduras", "Tegucigalpa"),
        ("Jamaica", "Kingston"),
        ("Mexico", "Mexico City"),
        ("Nicaragua", "Managua"),
        ("Panama", "Panama City"),
        ("Saint Kitts and Nevis", "Basseterre"),
        ("Saint Lucia", "Castries"),
        ("Saint Vincent and the Grenadines", "Kingstown"),
        ("Trinidad and Tobago", "Port of Spain"),
        ("the United States", "Washington, D.C."),
    ],
    "South America": [
        ("Argentina", "Buenos Aires"),
        ("Bolivia", "Sucre"),
        ("Brazil", "Brasília"),
        ("Chile", "Santiago"),
        ("Colombia", "Bogotá"),
        ("Ecuador", "Quito"),
        ("Guyana", "Georgetown"),
        ("Paraguay", "Asunción"),
        ("Peru", "Lima"),
        ("Suriname", "Paramaribo"),
        ("Uruguay", "Montevideo"),
        ("Venezuela", "Caracas"),
    ],
    "Asia": [
        ("Afghanistan", "Kabul"),
        ("Armenia", "Yerevan"),
        ("Azerbaijan", "Baku"),
        ("Bahrain", "Manama"),
        ("Bangladesh", "Dhaka"),
        ("Bhutan", "Thimphu"),
        ("Brunei", "Bandar Seri Begawan"),
        ("Cambodia", "Phnom Penh"),
        ("China", "Beijing"),
        ("Cyprus", "Nicosia"),
        ("East Timor", "Dili"),
        ("Georgia", "Tbilisi"),
        ("India", "New Delhi"),
        ("Indonesia", "Jakarta"),
        ("Iran", "Tehran"),
        ("Iraq", "Baghdad"),
        ("Israel", "Jerusalem"),
        ("Japan", "Tokyo"),
        ("Jordan", "Amman"),
        ("Kazakhstan", "Astana"),
        ("Kuwait", "Kuwait City"),
        ("Kyrgyzstan", "Bishkek"),
        ("Laos", "Vientiane"),
        ("Lebanon", "Beirut"),
        ("Malaysia", "Kuala Lumpur"),
        ("the Maldives", "Malé"),
        ("Mongolia", "Ulaanbaatar"),
        ("Myanmar", "Naypyidaw"),
        ("Nepal", "Kathmandu"),
        ("North Korea", "Pyongyang"),
        ("Oman", "Muscat"),
        ("Pakistan", "Islamabad"),
        ("the Philippines", "Manila"),
        ("Qatar", "Doha"),
        ("Saudi Arabia", "Riyadh"),
        ("Singapore", "Singapore"),
        ("South Korea", "Seoul"),
        ("Sri Lanka", "Sri Jayawardenepura Kotte"),
        ("Syria", "Damascus"),
        ("Taiwan", "Taipei"),
        ("Tajikistan", "Dushanbe"),
        ("Thailand", "Bangkok"),
        ("Turkey", "Ankara"),
        ("Turkmenistan", "Ashgabat"),
        ("the United Arab Emirates", "Abu Dhabi"),
        ("Uzbekistan", "Tashkent"),
        ("Vietnam", "Hanoi"),
        ("Yemen", "Sanaa"),
    ],
    "Europe": [
        ("Albania", "Tirana"),
        ("Andorra", "Andorra la Vella"),
        ("Austria", "Vienna"),
        ("Belarus", "Minsk"),
        ("Belgium", "Brussels"),
        ("Bosnia and Herzegovina", "Sarajevo"),
        ("Bulgaria", "Sofia"),
        ("Croatia", "Zagreb"),
        ("the Czech Republic", "Prague"),
        ("Denmark", "Copenhagen"),
        ("Estonia", "Tallinn"),
        ("Finland", "Helsinki"),
        ("France", "Paris"),
        ("Germany", "Berlin"),
        ("Greece", "Athens"),
        ("Hungary", "Budapest"),
        ("Iceland", "Reykjavík"),
        ("Ireland", "Dublin"),
        ("Italy", "Rome"),
        ("Kosovo", "Pristina"),
        ("Latvia", "Riga"),
        ("Liechtenstein", "Vaduz"),
        ("Lithuania", "Vilnius"),
        ("Luxembourg", "Luxembourg"),
        ("Malta", "Valletta"),
        ("Moldova", "Chișinău"),
        ("Monaco", "Monaco"),
        ("Montenegro", "Podgorica"),
        ("the Netherlands", "Amsterdam"),
        ("North Macedonia", "Skopje"),
        ("Norway", "Oslo"),
        ("Poland", "Warsaw"),
        ("Portugal", "Lisbon"),
        ("Romania", "Bucharest"),
        ("Russia", "Moscow"),
        ("San Marino", "San Marino"),
        ("Serbia", "Belgrade"),
        ("Slovakia", "Bratislava"),
        ("Slovenia", "Ljubljana"),
        ("Spain", "Madrid"),
        ("Sweden", "Stockholm"),
        ("Switzerland", "Bern"),
        ("Ukraine", "Kyiv"),
        ("the United Kingdom", "London"),
        ("Vatican City", "Vatican City"),
    ],
    "Oceania": [
        ("Australia", "Canberra"),
        ("Fiji", "Suva"),
        ("Kiribati", "South Tarawa"),
        ("the Marshall Islands", "Majuro"),
        ("the Federated States of Micronesia", "Palikir"),
        ("Nauru", "Yaren"),
        ("New Zealand", "Wellington"),
        ("Palau", "Ngerulmud"),
        ("Papua New Guinea", "Port Moresby"),
        ("Samoa", "Apia"),
        ("the Solomon Islands", "Honiara"),
        ("Tonga", "Nuku'alofa"),
        ("Tuvalu", "Funafuti"),
        ("Vanuatu", "Port Vila"),
    ],
}


def slug(country: str) -> str:
    """An ASCII id part: "São Tomé and Príncipe" -> "sao-tome-and-principe"."""
    ascii_name = unicodedata.normalize("NFKD", country).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower().removeprefix("the ")).strip("-")


def render() -> str:
    """The CSV's text: countries in alphabetical order (ignoring "the"), each in every template."""
    rows = sorted(
        (slug(country), country, capital, group)
        for group, pairs in COUNTRIES.items()
        for country, capital in pairs
    )
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for key, country, capital, group in rows:
        for template, wording in TEMPLATES.items():
            text = wording.format(country=country)
            writer.writerow((f"cap-{key}-{template}", text, capital, template, group))
    return out.getvalue()


if __name__ == "__main__":
    CSV_PATH.write_text(render(), encoding="utf-8")
    print(f"wrote {CSV_PATH}")
