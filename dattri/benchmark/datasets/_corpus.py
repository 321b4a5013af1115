"""A small original English corpus for the offline character-level GPT benchmark.

The text below was written for dattri and is released with it under the project's
MIT license. It is deliberately plain prose with dialogue, lists and numbers so
that a tiny character model has varied but learnable statistics.
"""

CORPUS = """\
THE KEEPER OF THE NORTH LIGHT

I.

The lighthouse stood at the end of a long grey spit of stone, and the keeper
walked out to it every evening at the same hour. He carried a lamp, a tin of
oil, a notebook and a pencil that he sharpened with a small folding knife. The
town behind him was quiet. The bakery had closed, the ferry had tied up for
the night, and the gulls had settled on the roofs of the sheds by the harbour.

He counted his steps as he walked. There were four hundred and twelve from the
last house to the iron door, and he had counted them so many times that the
number felt like a friend. When the wind was strong he counted more, because
he leaned into it and shortened his stride. When the wind was calm he counted
fewer. He wrote the number in his notebook every night, next to the date, the
height of the tide and a word for the colour of the sea.

"Why do you write it all down?" the baker's daughter asked him once. She was
nine years old and she asked questions the way other children threw stones,
quickly and without worrying where they would land.

"Because the sea changes a little every day," he said, "and if I do not write
it down, I will think it has always been the same."

"Has it always been the same?"

"No. That is the whole point."

II.

In the spring the fishing boats went out before dawn. The keeper watched their
lights move across the water like slow sparks. He knew each boat by the height
of its mast and the rhythm of its engine. The Mary Ellen was loud and steady.
The Little Heron coughed twice before it caught. The Northern Star was new and
made almost no sound at all, which the older fishermen did not trust.

On the morning of the seventh of April a fog came in from the east. It rolled
over the water in a soft white wall, and within ten minutes the keeper could
not see the end of his own railing. He lit the great lamp and started the
horn. The horn sounded every thirty seconds: one long note, low and patient,
that carried for miles over the water.

He stood at the window and listened. After a while he heard the Mary Ellen,
loud and steady, coming home. Then the Little Heron, coughing. Then nothing
for a long time. He wrote in his notebook: fog, 6:10, horn on. Then: Mary
Ellen in, 7:02. Little Heron in, 7:15. Northern Star: not yet.

III.

The Northern Star came home at half past eight, guided by the sound of the
horn and the smell of bread from the bakery. Her captain was a young woman
named Ada, who had bought the boat with money she had saved for six years.
She climbed the stairs of the lighthouse that afternoon with a loaf of bread
under her arm.

"I could not see my own hands," she said. "I turned the engine off and just
listened. Your horn was the only thing in the world that was not white."

"It is an old horn," said the keeper. "It has been doing that for a long time."

"Then I will thank the horn," said Ada, and she set the bread on the table.

They drank tea and looked at the sea, which had turned blue again as if
nothing had happened. Ada asked about the notebook, and the keeper showed her
the pages: numbers, tides, colours. Slate. Pewter. Green like bottle glass.
Silver at noon. Black with white edges.

"You should keep the fog days on a separate list," she said. "Then you could
see if they come in seasons."

He had never thought of that. That night he started a new page.

IV.

Over the summer the list grew. Fog on the seventh of April, the nineteenth of
May, the second and the third of June, the twenty-eighth of June. The keeper
noticed that the fog came most often after two warm days followed by a cold
night. He wrote this down carefully, with a question mark at the end, because
he did not yet believe it.

The baker's daughter helped him. She was ten now, and she could read the tide
tables faster than he could. Every afternoon she ran to the lighthouse after
school and copied the numbers into a second notebook, her own, with a red
cover.

"If the fog comes after two warm days and a cold night," she said, "then
tomorrow there will be fog."

"Maybe," said the keeper.

"Why maybe?"

"Because a rule that works three times is a guess. A rule that works thirty
times is a pattern. A rule that works three hundred times is still only a
very good guess."

The next morning there was fog. The girl was so pleased that she told the
whole school, and the teacher asked the keeper to come and talk to the class
about weather.

V.

He had never spoken to a room full of children before. He brought the two
notebooks and a jar of sea water, and he stood at the front of the classroom
and tried to explain what he did.

"A lighthouse is a very simple machine," he said. "It makes light when it is
dark and noise when it is foggy. But to know when it is going to be dark or
foggy, you have to pay attention. You have to watch the same thing every day
for years, and write it down honestly, even when nothing happens."

"Especially when nothing happens," said the baker's daughter from the second
row.

"Especially then," he agreed. "If you only write down the exciting days, you
will think that every day is exciting, and you will be wrong."

A boy at the back raised his hand. "What is the most exciting thing that ever
happened at the lighthouse?"

The keeper thought for a moment. "A woman brought me a loaf of bread," he said,
and the children laughed, because they thought it was a joke.

VI.

In the autumn the storms came. The wind pulled at the windows and the waves
broke over the end of the spit so that the keeper had to wait for the gaps
between them to run to the iron door. He counted his steps faster. Some nights
he counted five hundred and some nights he lost count altogether.

On the worst night of the year the power in the town went out. The keeper lit
the old oil lamp, the one that had been kept for emergencies since before he
was born, and he turned the great lens by hand, twelve turns every minute, for
nine hours. His arms burned. He sang to keep the rhythm: old songs, children's
songs, the names of the boats in the harbour, the numbers of the tide table.

In the morning Ada found him asleep on the floor of the lamp room with the
notebook open beside him. The last line said: 3:40, still turning, all boats
in, sea the colour of iron.

VII.

Years later, when the lighthouse was automated and the keeper had retired to a
small house behind the bakery, the baker's daughter came to visit him. She was
grown now and worked at a weather station in the city, where machines measured
the wind and the rain and the temperature every second of every day.

"We have so much data," she told him. "Millions of numbers. But sometimes I
still open your notebooks to check something."

"What do you check?"

"Whether a rule is real, or whether I only remember the days that agreed with
it. Your notebooks do not forget the quiet days."

The old man smiled and poured the tea. Outside, a soft grey fog was coming in
from the east, and somewhere far out on the water a horn was sounding, one
long note every thirty seconds, low and patient, as it always had.

THE END
"""
